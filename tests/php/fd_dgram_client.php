<?php
// The seed's PHP datagram client of section 15.7, adapted only in paths (socket
// path and file from the command line). The seed prints the stream client a
// second time under this heading; a datagram client needs SOCK_DGRAM, the one
// other change. It passes the file's descriptor with a one-byte payload (" ").
ini_set("display_errors", true);
$socket = socket_create(AF_UNIX, SOCK_DGRAM, 0);
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
