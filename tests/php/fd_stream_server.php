<?php
// The seed's PHP stream server of section 15.7 (descriptor passing), adapted only
// in paths: the socket path comes from the command line instead of "/root/fpm".
// It accepts connections forever and var_dumps what socket_recvmsg received,
// with room for 3 descriptors (socket_cmsg_space(SOL_SOCKET, SCM_RIGHTS, 3)).
ini_set("display_errors",true);
//
$socket = socket_create(AF_UNIX,SOCK_STREAM,0);
$dir = $argv[1];
unlink($dir);
socket_bind($socket,$dir);
socket_listen($socket,100);

while(1)
{
    $connfd = socket_accept($socket);
    var_dump($connfd);
    $data = ["controllen" => socket_cmsg_space(SOL_SOCKET, SCM_RIGHTS, 3)];
    $msg = socket_recvmsg($connfd,$data,0);
    var_dump($data);
}
