"""Property-based robustness of descriptor passing: nothing leaks, errors are clear.

Each property runs many random cases; after *every* case the process's
descriptor table must equal the table before it (checked inside the test,
per example, on top of the autouse ``no_fd_leak`` fixture):

* random frames and random splits of the byte stream (sans-IO, with the
  kernel's rule for where descriptors arrive), and the same through a real
  socketpair with a random receive size;
* truncated control buffers, in raw bytes and from the real kernel;
* too many descriptors for one message;
* the peer closing mid-message.
"""

from __future__ import annotations

import itertools
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afunix import Channel, ControlTruncated, ProtocolError, TooManyFds
from afunix import _cmsg as anc
from afunix._fds import recv_fds, send_fds, sendall_fds
from afunix._protocol import CLOSED, NEED_DATA, RawMessage, StreamDecoder, encode_header

from ..conftest import fd_baseline, simple_payload

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def devnull_fds(n: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


messages_st = st.lists(
    st.tuples(st.binary(max_size=40), st.integers(min_value=0, max_value=3)),
    min_size=1,
    max_size=6,
)


# ------------------------------------------------- random frames, random splits
@SETTINGS
@given(messages=messages_st, data=st.data())
def test_random_frames_random_splits(
    messages: list[tuple[bytes, int]], data: st.DataObject
) -> None:
    """Frames grouped at random into sendmsg calls (a group's descriptors ride on its
    first byte, as ``send(..., more=True)`` batches them), cut at random into recvmsg
    chunks, decoded by the general path or the fast one."""
    with fd_baseline():
        stream = b""
        header_at: list[int] = []
        for payload, nfds in messages:
            header_at.append(len(stream))
            stream += encode_header(len(payload), nfds) + payload
        n = len(messages)
        new_group = [True, *data.draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))]
        fast = data.draw(st.booleans())
        cuts = data.draw(st.sets(st.integers(min_value=1, max_value=max(len(stream) - 1, 1))))
        group_of = list(itertools.accumulate(int(g) for g in new_group))
        sent: list[list[int]] = [devnull_fds(n) for _, n in messages]  # after every draw
        starts: dict[int, int] = {}  # group -> offset of its first byte
        ends: dict[int, int] = {}  # group -> offset just past it
        fds_of: dict[int, list[int]] = {}
        for i, group in enumerate(group_of):
            starts.setdefault(group, header_at[i])
            ends[group] = header_at[i] + 8 + len(messages[i][0])
            fds_of.setdefault(group, []).extend(sent[i])
        # The kernel's rule: a recvmsg ends at the latest with the sendmsg that
        # carried descriptors, and those descriptors come with its first byte.
        must = {ends[g] for g in fds_of if fds_of[g]} | {len(stream)}
        points = sorted({0, *must, *(c for c in cuts if c < len(stream))})
        dec = StreamDecoder()
        got: list[RawMessage] = []

        def next_one() -> RawMessage | object:
            if not fast:
                return dec.next_message()
            item = dec.next_fast()
            if item is None:
                return dec.next_message()
            body, fds = item if type(item) is tuple else (simple_payload(item), [])
            return RawMessage(body, fds, 0, len(body))

        try:
            for start, end in itertools.pairwise(points):
                fds = [fd for g, at in starts.items() if start <= at < end for fd in fds_of[g]]
                dec.receive_data(stream[start:end], fds)
                while isinstance(ev := next_one(), RawMessage):
                    got.append(ev)
                assert ev is NEED_DATA
            dec.receive_data(b"")
            assert dec.next_message() is CLOSED
            assert [(m.data, m.fds) for m in got] == [
                (p, sent[i]) for i, (p, _) in enumerate(messages)
            ]
        finally:
            dec.close()
            for m in got:
                anc.close_fds(m.fds)


@SETTINGS
@given(
    messages=messages_st,
    bufsize=st.integers(min_value=1, max_value=64),
    kind=st.sampled_from(["stream", "seqpacket", "dgram"]),
    more=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_random_frames_through_the_kernel(
    messages: list[tuple[bytes, int]], bufsize: int, kind: str, more: list[bool]
) -> None:
    """A real socketpair; a tiny ``recv_bufsize`` makes the kernel split the stream;
    ``more=True`` batches messages and their descriptors into one ``sendmsg``."""
    with fd_baseline():
        a, b = Channel.pair(kind, recv_bufsize=bufsize)
        with a, b:
            base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st_base = os.fstat(base)
                for (payload, nfds), held in zip(messages, more, strict=False):
                    a.send(payload, [base] * nfds, more=held and kind == "stream")
                a.flush()
                for payload, nfds in messages:
                    with b.recv() as msg:
                        assert msg.data == payload
                        assert len(msg.fds) == nfds
                        for fd in msg.fds:
                            st_fd = os.fstat(fd)
                            assert (st_fd.st_ino, st_fd.st_dev) == (st_base.st_ino, st_base.st_dev)
            finally:
                os.close(base)


# ------------------------------------------------------- truncated control data
@SETTINGS
@given(nfds=st.integers(min_value=1, max_value=8), data=st.data())
def test_truncated_control_buffer_from_the_kernel(nfds: int, data: st.DataObject) -> None:
    # The last message needs no trailing padding: CMSG_LEN is the smallest room
    # that fits all of them, anything below truncates.
    fits = socket.CMSG_LEN(nfds * 4)
    ancbufsize = data.draw(st.integers(min_value=0, max_value=fits - 1))
    with fd_baseline():
        a, b = socket.socketpair()
        with a, b:
            base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                send_fds(a, b"m", [base] * nfds)
            finally:
                os.close(base)
            _, triples, flags, _ = b.recvmsg(1, ancbufsize, socket.MSG_CMSG_CLOEXEC)
            arrived = len(anc.fds_in(triples))
            assert arrived < nfds
            with pytest.raises(ControlTruncated, match="MSG_CTRUNC") as info:
                anc.decode(triples, flags)
            assert info.value.fds_closed == arrived


@SETTINGS
@given(nfds=st.integers(min_value=2, max_value=8), data=st.data())
def test_receiver_with_too_little_room(nfds: int, data: st.DataObject) -> None:
    maxfds = data.draw(st.integers(min_value=0, max_value=nfds - 1))
    with fd_baseline():
        a, b = socket.socketpair()
        with a, b:
            base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                send_fds(a, b"m", [base] * nfds)
            finally:
                os.close(base)
            with pytest.raises(ControlTruncated, match=f"room for {maxfds}|made no room"):
                recv_fds(b, 1, maxfds)


@SETTINGS
@given(
    items=st.lists(st.sampled_from(["rights", "creds"]), min_size=1, max_size=4),
    data=st.data(),
)
def test_truncated_raw_buffers(items: list[str], data: st.DataObject) -> None:
    # Draw before opening anything: a draw may abort the example.
    size = sum(anc.NATIVE_LAYOUT.space(8 if kind == "rights" else 12) for kind in items)
    cut = data.draw(st.integers(min_value=0, max_value=size))
    with fd_baseline():
        fds = devnull_fds(items.count("rights") * 2)
        pool = iter(fds)
        triples = anc.encode(
            [
                anc.Rights((next(pool), next(pool)))
                if kind == "rights"
                else anc.Credentials(1, 2, 3)
                for kind in items
            ]
        )
        raw = anc.pack_buffer(triples)
        assert len(raw) == size
        # The kernel sets MSG_CTRUNC whenever it had to cut the control data.
        flags = socket.MSG_CTRUNC if cut < len(raw) else 0
        present = anc.fds_in(anc.unpack_buffer(raw[:cut], socket.MSG_CTRUNC))
        try:
            got = anc.unpack_buffer(raw[:cut], flags)
            items_out = anc.decode(got, flags)
        except anc.ControlError as exc:
            assert cut < len(raw)
            assert "MSG_CTRUNC" in str(exc)
            assert exc.fds_closed == len(present)
            assert not any(_is_open(fd) for fd in present)
            # The ones cut off were never received; the test owns and closes them.
            anc.close_fds(fd for fd in fds if fd not in present)
        else:
            assert cut == len(raw)
            assert anc.fds_in(got) == fds
            assert len(items_out) == len(items)
            anc.close_fds(fds)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ---------------------------------------------------------- too many descriptors
@settings(max_examples=10, deadline=None)
@given(n=st.integers(min_value=254, max_value=400), kind=st.sampled_from(["stream", "dgram"]))
def test_too_many_descriptors_are_refused_before_sending(n: int, kind: str) -> None:
    with fd_baseline():
        a, b = Channel.pair(kind)
        with a, b:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with pytest.raises(TooManyFds, match="253"):
                    a.send(b"x", [fd] * n)
                with pytest.raises(TooManyFds):
                    send_fds(a.socket, b"x", [fd] * n)
                with pytest.raises(TooManyFds):
                    sendall_fds(a.socket, b"x", [fd] * n)
            finally:
                os.close(fd)
            with pytest.raises(BlockingIOError):  # nothing at all was sent
                b.socket.recv(1, socket.MSG_DONTWAIT)


# ------------------------------------------------------- peer closes mid-message
@SETTINGS
@given(
    payload=st.binary(min_size=0, max_size=64),
    nfds=st.integers(min_value=0, max_value=3),
    data=st.data(),
)
def test_peer_closing_mid_message(payload: bytes, nfds: int, data: st.DataObject) -> None:
    raw = encode_header(len(payload), nfds) + payload
    cut = data.draw(st.integers(min_value=1, max_value=len(raw) - 1))
    with fd_baseline():
        ours, theirs = socket.socketpair()
        chan = Channel(ours)
        with chan:
            fds = devnull_fds(nfds)
            try:
                # The peer writes part of a frame, descriptors on its first byte.
                sendall_fds(theirs, raw[:cut], fds)
            finally:
                anc.close_fds(fds)
                theirs.close()
            with pytest.raises(ProtocolError, match=r"mid-message|none arrived") as info:
                chan.recv()
            assert info.value.errno is not None
            assert chan.closed  # the connection is closed with its descriptors


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["stream", "seqpacket"]))
def test_peer_closing_between_messages_is_eof(kind: str) -> None:
    with fd_baseline():
        a, b = Channel.pair(kind)
        with b:
            a.send(b"last", [0])
            a.close()
            with b.recv() as msg:
                assert msg.data == b"last"
            with pytest.raises(EOFError):
                b.recv()
