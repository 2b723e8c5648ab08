<?php
// The seed's PHP datagram server of section 15.7, adapted only in paths: the
// socket path comes from the command line, and is assigned before its first
// use (the seed's listing sets $dir after unlink()/socket_bind() have used it).
// It var_dumps every datagram received, with room for 3 descriptors.
$dir = $argv[1];
$s = socket_create(AF_UNIX, SOCK_DGRAM, 0) or die("err");
unlink($dir);
$br = socket_bind($s, $dir) or die("err");

while(1)
{
    $data = ["name" => [], "buffer_size" => 2000, "controllen" => socket_cmsg_space(SOL_SOCKET, SCM_RIGHTS, 3)];
    $result = socket_recvmsg($s, $data, 0);
    if($result)
    {
        var_dump($data);
    }
}
