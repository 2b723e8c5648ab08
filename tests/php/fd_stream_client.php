<?php
// The seed's PHP stream client of section 15.7, adapted only in paths: the
// socket path ("/root/fpm") and the file to pass ("/root/common.h") come from
// the command line. It opens the file and passes its descriptor with a
// one-byte payload (" ").

ini_set("display_errors", true);
$socket = socket_create(AF_UNIX, SOCK_STREAM, 0);
$dir = $argv[1];
$result = socket_connect($socket, $dir);

var_dump($result);
$fp = fopen($argv[2], "r");
var_dump($fp);
$r = socket_sendmsg($socket, [
        "iov" => [" "],
        "control" =>
        [
            [
                "level" => SOL_SOCKET,
                "type" => SCM_RIGHTS,
                "data" => [$fp]
            ]
        ]
    ]
    , 0);
