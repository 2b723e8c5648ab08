/*
 * afunix._ccore: the optional compiled core of a channel (issue 16, DESIGN.md section 8).
 *
 * Four functions, each the twin of a pure-Python reference with the same contract
 * (afunix._io.py_recv_frame and py_send_frame, afunix._protocol.message.py_scan_plain,
 * afunix._protocol.framing.py_hold_frame): the reference decides what is right, and
 * tests/unit/test_ccore.py runs both on the same bytes and descriptors and demands the
 * same answers.
 *
 *   recv_frame(sock, buf, ancbufsize, max_size, maxfds)
 *       one recvmsg (MSG_CMSG_CLOEXEC) into the writable buffer *buf*; when exactly one
 *       whole simple frame came (magic, no flags, length <= max_size, its 0 < n <= maxfds
 *       descriptors in one well-formed SCM_RIGHTS, no MSG_CTRUNC), the Message; else the
 *       raw (nbytes, ancdata, msg_flags) of the receive, ancdata as socket.recvmsg gives it,
 *       for the Python protocol to decide; None (nothing read) when the socket is in
 *       non-blocking mode and has nothing: the Python socket's own call then waits as its
 *       timeout says.
 *   scan_plain(src, pos, max_size, out) -> pos
 *       from offset *pos* of the bytes-like *src*, every whole plain frame (no flags, no
 *       descriptors, length <= max_size) becomes a Message appended to the list *out*;
 *       returns the offset of the first byte not consumed.
 *   send_frame(sock, data, fds, limit) -> int
 *       when *data* is bytes or bytearray of at most *limit* bytes and *fds* a tuple or list
 *       of at most 253 non-negative ints: one sendmsg (MSG_NOSIGNAL) of the frame, its
 *       descriptors in SCM_RIGHTS; returns the bytes of the frame that went. Else -1,
 *       nothing done: the Python protocol takes the message (also when a socket in
 *       non-blocking mode has no room: the Python socket's own call waits as it should).
 *
 *   hold_frame(held, data, limit) -> int
 *       when *data* is bytes or bytearray of at most *limit* bytes: its plain frame is
 *       appended to the bytearray *held* (what send(..., more=True) holds); the new length
 *       of *held*. Else -1, nothing done.
 *
 * Plus set_types(Message, Fds): the classes received messages are made of. Message is a
 * subclass of MessageBase (defined here: five slots), so a message is one allocation.
 *
 * Only the limited API of CPython 3.11 (Py_LIMITED_API); no private names. Every
 * descriptor received is closed again on any failure before it is handed out. System calls
 * run without the GIL and are retried on EINTR after running signal handlers (PEP 475).
 */

#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef MSG_CMSG_CLOEXEC
#define MSG_CMSG_CLOEXEC 0
#endif
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

#define MAGIC 0xAFu
#define PLAIN_WORD (MAGIC << 24)
#define HEADER_SIZE 8
#define SCM_MAX_FD 253
/* Control buffers up to this size live on the stack (room for SCM_MAX_FD descriptors and
 * credentials is about 1.1 KiB). */
#define STACK_CONTROL 4096

typedef struct {
    PyObject *message_type; /* afunix._protocol.message.Message */
    PyObject *fds_type;     /* afunix._protocol.message._Fds */
    PyObject *base_type;    /* MessageBase */
    PyObject *fileno_name;  /* "fileno" */
} core_state;

typedef struct {
    PyObject_HEAD
    PyObject *fds;
    PyObject *payload;
    PyObject *address;
    PyObject *credentials;
    PyObject *data;
} MessageBase;

static core_state *
state_of(PyObject *module)
{
    return (core_state *)PyModule_GetState(module);
}

/* -- MessageBase ------------------------------------------------------------------------ */

static int
mb_traverse(PyObject *self, visitproc visit, void *arg)
{
    MessageBase *m = (MessageBase *)self;
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(m->fds);
    Py_VISIT(m->payload);
    Py_VISIT(m->address);
    Py_VISIT(m->credentials);
    Py_VISIT(m->data);
    return 0;
}

static int
mb_clear(PyObject *self)
{
    MessageBase *m = (MessageBase *)self;
    Py_CLEAR(m->fds);
    Py_CLEAR(m->payload);
    Py_CLEAR(m->address);
    Py_CLEAR(m->credentials);
    Py_CLEAR(m->data);
    return 0;
}

static void
mb_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    mb_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static PyMemberDef mb_members[] = {
    {"_fds", T_OBJECT_EX, offsetof(MessageBase, fds), 0, NULL},
    {"_payload", T_OBJECT_EX, offsetof(MessageBase, payload), 0, NULL},
    {"address", T_OBJECT_EX, offsetof(MessageBase, address), 0, NULL},
    {"credentials", T_OBJECT_EX, offsetof(MessageBase, credentials), 0, NULL},
    {"data", T_OBJECT_EX, offsetof(MessageBase, data), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot mb_slots[] = {
    {Py_tp_doc, "The five slots of afunix.Message, filled by the compiled core."},
    {Py_tp_members, mb_members},
    {Py_tp_traverse, mb_traverse},
    {Py_tp_clear, mb_clear},
    {Py_tp_dealloc, mb_dealloc},
    {0, NULL},
};

static PyType_Spec mb_spec = {
    "afunix._ccore.MessageBase",
    sizeof(MessageBase),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    mb_slots,
};

/* A new message of the registered type: data and fds stolen (fds NULL: a new empty list). */
static PyObject *
new_message(core_state *st, PyObject *data, PyObject *fds)
{
    PyTypeObject *tp = (PyTypeObject *)st->message_type;
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    if (fds == NULL && (fds = PyList_New(0)) == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    PyObject *obj = alloc(tp, 0);
    if (obj == NULL) {
        /* The caller closes the descriptors: empty the list first, so that its
         * finalizer (which closes what it holds, with a warning) closes nothing. */
        PyList_SetSlice(fds, 0, PY_SSIZE_T_MAX, NULL);
        Py_DECREF(data);
        Py_DECREF(fds);
        return NULL;
    }
    MessageBase *m = (MessageBase *)obj;
    m->data = data;
    m->fds = fds;
    m->payload = Py_NewRef(Py_None);
    m->address = Py_NewRef(Py_None);
    m->credentials = Py_NewRef(Py_None);
    return obj;
}

/* -- helpers ---------------------------------------------------------------------------- */

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void
put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* The descriptor of a socket object (its fileno()); a closed one (-1) is EBADF, as the
 * socket's own calls say. */
static int
sock_fd(core_state *st, PyObject *sock)
{
    PyObject *num = PyObject_CallMethodObjArgs(sock, st->fileno_name, NULL);
    if (num == NULL)
        return -1;
    long fd = PyLong_AsLong(num);
    Py_DECREF(num);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT32_MAX) {
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return (int)fd;
}

static int
require_types(core_state *st)
{
    if (st->message_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "afunix._ccore.set_types() was not called");
        return -1;
    }
    return 0;
}

/* The length of a control message's data that lies within the buffer (as CPython's
 * socket module computes it); sets *truncated when the kernel's cmsg_len overruns it. */
static size_t
cmsg_data_len(const struct msghdr *msg, const struct cmsghdr *c, int *truncated)
{
    const char *end = (const char *)msg->msg_control + msg->msg_controllen;
    const char *data = (const char *)CMSG_DATA(c);
    size_t room = data <= end ? (size_t)(end - data) : 0;
    size_t want = c->cmsg_len >= CMSG_LEN(0) ? c->cmsg_len - CMSG_LEN(0) : 0;
    *truncated = c->cmsg_len < CMSG_LEN(0) || want > room;
    return want < room ? want : room;
}

/* Close every descriptor of every SCM_RIGHTS message in *msg* (a failure after receive). */
static void
close_rights(const struct msghdr *msg)
{
    struct cmsghdr *c;
    if (msg->msg_controllen == 0)
        return;
    for (c = CMSG_FIRSTHDR((struct msghdr *)msg); c != NULL;
         c = CMSG_NXTHDR((struct msghdr *)msg, c)) {
        int truncated;
        size_t len = cmsg_data_len(msg, c, &truncated);
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            const unsigned char *p = CMSG_DATA(c);
            for (size_t i = 0; i + sizeof(int) <= len; i += sizeof(int)) {
                int fd;
                memcpy(&fd, p + i, sizeof fd);
                close(fd);
            }
        }
        if (c->cmsg_len < CMSG_LEN(0))
            break;
    }
}

/* The control data as socket.recvmsg gives it: [(level, type, bytes), ...]. */
static PyObject *
ancdata_list(const struct msghdr *msg)
{
    PyObject *list = PyList_New(0);
    struct cmsghdr *c;
    if (list == NULL || msg->msg_controllen == 0)
        return list;
    for (c = CMSG_FIRSTHDR((struct msghdr *)msg); c != NULL;
         c = CMSG_NXTHDR((struct msghdr *)msg, c)) {
        int truncated;
        size_t len = cmsg_data_len(msg, c, &truncated);
        if (truncated && PyErr_WarnEx(PyExc_RuntimeWarning,
                                      "received malformed or improperly-truncated ancillary data",
                                      1) < 0)
            goto fail;
        if (c->cmsg_len < CMSG_LEN(0))
            break;
        PyObject *item = Py_BuildValue("(iiy#)", (int)c->cmsg_level, (int)c->cmsg_type,
                                       (const char *)CMSG_DATA(c), (Py_ssize_t)len);
        if (item == NULL)
            goto fail;
        int rc = PyList_Append(list, item);
        Py_DECREF(item);
        if (rc < 0)
            goto fail;
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

/* EAGAIN on a socket in non-blocking mode: a Python socket with a timeout (or 0) would wait
 * in its own way (poll up to the timeout, or BlockingIOError): the Python code does that
 * call instead. A blocking socket's EAGAIN is SO_RCVTIMEO/SO_SNDTIMEO running out: raised. */
static int
would_wait(int fd, int err)
{
    if (err != EAGAIN && err != EWOULDBLOCK)
        return 0;
    int flags = fcntl(fd, F_GETFL);
    return flags >= 0 && (flags & O_NONBLOCK);
}

/* -- recv_frame ------------------------------------------------------------------------- */

/* The message of exactly one whole simple frame in buf[0:n], or NULL without an error
 * set when it is anything else. Steals nothing; on an error (set) the caller closes. */
static PyObject *
simple_message(core_state *st, const unsigned char *buf, Py_ssize_t n, Py_ssize_t size,
               const struct msghdr *msg, long max_size, long maxfds)
{
    if (n < HEADER_SIZE || n >= size)
        return NULL;
    uint32_t word = be32(buf), length = be32(buf + 4);
    if ((Py_ssize_t)length != n - HEADER_SIZE || (long)length > max_size ||
        (msg->msg_flags & MSG_CTRUNC))
        return NULL;
    if (word == PLAIN_WORD) {
        if (msg->msg_controllen != 0)
            return NULL;
        PyObject *data = PyBytes_FromStringAndSize((const char *)buf + HEADER_SIZE, length);
        return data == NULL ? NULL : new_message(st, data, NULL);
    }
    long nfds = (long)word - (long)PLAIN_WORD;
    if (nfds <= 0 || nfds > maxfds || msg->msg_controllen == 0)
        return NULL;
    struct cmsghdr *c = CMSG_FIRSTHDR((struct msghdr *)msg);
    if (c == NULL || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len != CMSG_LEN(sizeof(int) * (size_t)nfds) ||
        CMSG_NXTHDR((struct msghdr *)msg, c) != NULL)
        return NULL;
    int truncated;
    if (cmsg_data_len(msg, c, &truncated) != sizeof(int) * (size_t)nfds || truncated)
        return NULL;
    PyObject *fds = PyObject_CallNoArgs(st->fds_type);
    if (fds == NULL)
        return NULL;
    const unsigned char *p = CMSG_DATA(c);
    for (long i = 0; i < nfds; i++) {
        int fd;
        memcpy(&fd, p + i * (long)sizeof(int), sizeof fd);
        PyObject *num = PyLong_FromLong(fd);
        if (num == NULL || PyList_Append(fds, num) < 0) {
            Py_XDECREF(num);
            goto fail;
        }
        Py_DECREF(num);
    }
    PyObject *data = PyBytes_FromStringAndSize((const char *)buf + HEADER_SIZE, length);
    if (data == NULL)
        goto fail;
    return new_message(st, data, fds);
fail:
    /* The list holds numbers the caller still closes: empty it first, so that its
     * finalizer (which closes what it holds, with a warning) closes nothing. */
    PyList_SetSlice(fds, 0, PY_SSIZE_T_MAX, NULL);
    Py_DECREF(fds);
    return NULL;
}

static PyObject *
core_recv_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    core_state *st = state_of(module);
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "recv_frame(sock, buf, ancbufsize, max_size, maxfds) takes 5 arguments");
        return NULL;
    }
    if (require_types(st) < 0)
        return NULL;
    long ancbufsize = PyLong_AsLong(args[2]);
    long max_size = PyLong_AsLong(args[3]);
    long maxfds = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (ancbufsize < 0 || ancbufsize > (1L << 20)) {
        PyErr_SetString(PyExc_ValueError, "ancbufsize out of range");
        return NULL;
    }
    int fd = sock_fd(st, args[0]);
    if (fd < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE) < 0)
        return NULL;

    union {
        struct cmsghdr align;
        char bytes[STACK_CONTROL];
    } stack;
    char *control = stack.bytes;
    if (ancbufsize > STACK_CONTROL && (control = PyMem_Malloc((size_t)ancbufsize)) == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    struct iovec iov = {view.buf, (size_t)view.len};
    struct msghdr msg;
    ssize_t n;
    int err;
    PyObject *result;
    for (;;) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ancbufsize ? control : NULL;
        msg.msg_controllen = (size_t)ancbufsize;
        Py_BEGIN_ALLOW_THREADS
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0)
            goto fail_free;
    }
    if (n < 0) {
        if (would_wait(fd, err)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail_free;
    }
    result = simple_message(st, (const unsigned char *)view.buf, (Py_ssize_t)n, view.len, &msg,
                            max_size, maxfds);
    if (result == NULL && !PyErr_Occurred()) {
        PyObject *anc = ancdata_list(&msg);
        if (anc != NULL)
            result = Py_BuildValue("(nNi)", (Py_ssize_t)n, anc, (int)msg.msg_flags);
    }
    if (result == NULL)
        close_rights(&msg);
done:
    if (control != stack.bytes)
        PyMem_Free(control);
    PyBuffer_Release(&view);
    return result;
fail_free:
    if (control != stack.bytes)
        PyMem_Free(control);
    PyBuffer_Release(&view);
    return NULL;
}

/* -- scan_plain ------------------------------------------------------------------------- */

static PyObject *
core_scan_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    core_state *st = state_of(module);
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "scan_plain(src, pos, max_size, out) takes 4 arguments");
        return NULL;
    }
    if (require_types(st) < 0)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    long max_size = PyLong_AsLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *out = args[3];
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "scan_plain: out must be a list");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || pos > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    const unsigned char *src = (const unsigned char *)view.buf;
    Py_ssize_t end = view.len;
    while (end - pos >= HEADER_SIZE) {
        uint32_t word = be32(src + pos), length = be32(src + pos + 4);
        if (word != PLAIN_WORD || (long)length > max_size ||
            (Py_ssize_t)length > end - pos - HEADER_SIZE)
            break;
        PyObject *data =
            PyBytes_FromStringAndSize((const char *)src + pos + HEADER_SIZE, length);
        PyObject *msg = data == NULL ? NULL : new_message(st, data, NULL);
        if (msg == NULL)
            goto fail;
        int rc = PyList_Append(out, msg);
        Py_DECREF(msg);
        if (rc < 0)
            goto fail;
        pos += HEADER_SIZE + (Py_ssize_t)length;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* -- send_frame ------------------------------------------------------------------------- */

/* The descriptor numbers of a tuple or list of plain non-negative ints: their count, or -1
 * when *fds* is anything else (the Python protocol converts and checks those). */
static Py_ssize_t
plain_fds(PyObject *fds, int *out)
{
    Py_ssize_t n;
    if (PyTuple_CheckExact(fds))
        n = PyTuple_Size(fds);
    else if (PyList_CheckExact(fds))
        n = PyList_Size(fds);
    else
        return -1;
    if (n > SCM_MAX_FD)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_CheckExact(fds) ? PyTuple_GetItem(fds, i) : PyList_GetItem(fds, i);
        if (item == NULL || !PyLong_CheckExact(item))
            return -1;
        long v = PyLong_AsLong(item);
        if (v < 0 || v > INT32_MAX) {
            PyErr_Clear();
            return -1;
        }
        out[i] = (int)v;
    }
    return n;
}

static PyObject *
core_send_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send_frame(sock, data, fds, limit) takes 4 arguments");
        return NULL;
    }
    PyObject *data = args[1];
    if (!PyBytes_CheckExact(data) && !PyByteArray_CheckExact(data))
        return PyLong_FromLong(-1);
    long limit = PyLong_AsLong(args[3]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = PyBytes_CheckExact(data) ? PyBytes_Size(data) : PyByteArray_Size(data);
    if (size > limit)
        return PyLong_FromLong(-1);
    int numbers[SCM_MAX_FD];
    Py_ssize_t nfds = plain_fds(args[2], numbers);
    if (nfds < 0)
        return PyLong_FromLong(-1);
    int fd = sock_fd(state_of(module), args[0]);
    if (fd < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len > limit || view.len > (Py_ssize_t)UINT32_MAX) { /* (resized meanwhile) */
        PyBuffer_Release(&view);
        return PyLong_FromLong(-1);
    }
    unsigned char header[HEADER_SIZE];
    put_be32(header, PLAIN_WORD | (uint32_t)nfds);
    put_be32(header + 4, (uint32_t)view.len);
    struct iovec iov[2] = {{header, HEADER_SIZE}, {view.buf, (size_t)view.len}};
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * SCM_MAX_FD)];
    } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = view.len ? 2 : 1;
    if (nfds) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), numbers, sizeof(int) * (size_t)nfds);
    }
    ssize_t sent;
    int err;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
        err = errno;
        Py_END_ALLOW_THREADS
        if (sent >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    if (sent < 0) {
        if (would_wait(fd, err))
            return PyLong_FromLong(-1);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t((Py_ssize_t)sent);
}

/* -- hold_frame ------------------------------------------------------------------------- */

static PyObject *
core_hold_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "hold_frame(held, data, limit) takes 3 arguments");
        return NULL;
    }
    PyObject *held = args[0], *data = args[1];
    if (!PyByteArray_Check(held)) {
        PyErr_SetString(PyExc_TypeError, "hold_frame: held must be a bytearray");
        return NULL;
    }
    if (!PyBytes_CheckExact(data) && !PyByteArray_CheckExact(data))
        return PyLong_FromLong(-1);
    long limit = PyLong_AsLong(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = PyBytes_CheckExact(data) ? PyBytes_Size(data) : PyByteArray_Size(data);
    if (size > limit || size > (Py_ssize_t)UINT32_MAX)
        return PyLong_FromLong(-1);
    if (held == data) { /* (appending a bytearray to itself: the Python way copes) */
        PyErr_SetString(PyExc_ValueError, "hold_frame: data is held");
        return NULL;
    }
    Py_ssize_t at = PyByteArray_Size(held);
    if (PyByteArray_Resize(held, at + HEADER_SIZE + size) < 0)
        return NULL;
    unsigned char *out = (unsigned char *)PyByteArray_AsString(held) + at;
    put_be32(out, PLAIN_WORD);
    put_be32(out + 4, (uint32_t)size);
    const char *src = PyBytes_CheckExact(data) ? PyBytes_AsString(data) : PyByteArray_AsString(data);
    if (size)
        memcpy(out + HEADER_SIZE, src, (size_t)size);
    return PyLong_FromSsize_t(at + HEADER_SIZE + size);
}

/* -- set_types -------------------------------------------------------------------------- */

static PyObject *
core_set_types(PyObject *module, PyObject *args)
{
    core_state *st = state_of(module);
    PyObject *message, *fds;
    if (!PyArg_ParseTuple(args, "OO:set_types", &message, &fds))
        return NULL;
    if (!PyType_Check(message) ||
        !PyType_IsSubtype((PyTypeObject *)message, (PyTypeObject *)st->base_type)) {
        PyErr_SetString(PyExc_TypeError, "set_types: Message must subclass MessageBase");
        return NULL;
    }
    if (!PyType_Check(fds) || !PyType_IsSubtype((PyTypeObject *)fds, &PyList_Type)) {
        PyErr_SetString(PyExc_TypeError, "set_types: Fds must subclass list");
        return NULL;
    }
    PyObject *old_message = st->message_type, *old_fds = st->fds_type;
    st->message_type = Py_NewRef(message);
    st->fds_type = Py_NewRef(fds);
    Py_XDECREF(old_message);
    Py_XDECREF(old_fds);
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"recv_frame", (PyCFunction)(void (*)(void))core_recv_frame, METH_FASTCALL,
     "recv_frame(sock, buf, ancbufsize, max_size, maxfds): a Message, or (n, ancdata, flags)."},
    {"scan_plain", (PyCFunction)(void (*)(void))core_scan_plain, METH_FASTCALL,
     "scan_plain(src, pos, max_size, out): the messages of the whole plain frames from pos, "
     "appended to out; the new pos."},
    {"send_frame", (PyCFunction)(void (*)(void))core_send_frame, METH_FASTCALL,
     "send_frame(sock, data, fds, limit): bytes of the frame sent, or -1 (not for this path)."},
    {"hold_frame", (PyCFunction)(void (*)(void))core_hold_frame, METH_FASTCALL,
     "hold_frame(held, data, limit): append the plain frame of data to the bytearray held; "
     "its new length, or -1 (not for this path)."},
    {"set_types", core_set_types, METH_VARARGS,
     "set_types(Message, Fds): the classes received messages are made of."},
    {NULL, NULL, 0, NULL},
};

static int
core_exec(PyObject *module)
{
    core_state *st = state_of(module);
    st->fileno_name = PyUnicode_InternFromString("fileno");
    if (st->fileno_name == NULL)
        return -1;
    st->base_type = PyType_FromModuleAndSpec(module, &mb_spec, NULL);
    if (st->base_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(module, "MessageBase", st->base_type) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "ABI", 1) < 0)
        return -1;
    return 0;
}

static int
core_traverse(PyObject *module, visitproc visit, void *arg)
{
    core_state *st = state_of(module);
    Py_VISIT(st->message_type);
    Py_VISIT(st->fds_type);
    Py_VISIT(st->base_type);
    Py_VISIT(st->fileno_name);
    return 0;
}

static int
core_clear(PyObject *module)
{
    core_state *st = state_of(module);
    Py_CLEAR(st->message_type);
    Py_CLEAR(st->fds_type);
    Py_CLEAR(st->base_type);
    Py_CLEAR(st->fileno_name);
    return 0;
}

static void
core_free(void *module)
{
    core_clear((PyObject *)module);
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    "afunix._ccore",
    "The optional compiled core of afunix channels (see afunix._core: which core runs).",
    sizeof(core_state),
    core_methods,
    core_slots,
    core_traverse,
    core_clear,
    core_free,
};

PyMODINIT_FUNC
PyInit__ccore(void)
{
    return PyModuleDef_Init(&core_module);
}
