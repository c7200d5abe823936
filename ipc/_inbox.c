/*
 * wsfleet.ipc._inbox: a peer's queue of received messages, and the per-record
 * loop that fills those queues from a batch of ring records (see inbox.py).
 *
 * `Inbox` is a FIFO of (payload, was_text) that counts its bytes and knows
 * the two limits beyond which the reader should stop reading the socket.
 * The payloads sit in a list with a moving head (no tuple per message); the
 * text flags in a byte array beside it.
 *
 * `deliver` walks a list of records (kind, peer, flags, payload) as
 * pop_records of _fastring.c makes them, from an index, while they are
 * messages: it looks the peer up in a dict of objects with an `inbox`
 * attribute, appends the payload, reports a peer whose inbox reached a limit,
 * and then, per message, calls the handlers (or, per peer, notes the peer
 * once in a list of ready peers).  It stops at the first record that is not
 * a message, and when a handler raises, and says where, so that the caller
 * (Python) handles those and calls it again from there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    PyObject *items;        /* list of payloads; the live ones are items[head:] */
    unsigned char *texts;   /* text flag of items[i] at texts[i] */
    Py_ssize_t texts_size;  /* allocated bytes of texts */
    Py_ssize_t head;        /* first live item */
    Py_ssize_t bytes;       /* payload bytes of the live items */
    Py_ssize_t max_packets; /* limits: reaching either one sets `paused` */
    Py_ssize_t max_bytes;
    char paused;            /* the reader was asked to stop reading */
    char ready;             /* the peer is in this poll's ready list already */
} Inbox;

static PyTypeObject InboxType;

static inline Py_ssize_t
inbox_len(Inbox *self)
{
    return PyList_GET_SIZE(self->items) - self->head;
}

/* An Inbox made by __new__ alone has no list yet: every method checks. */
static int
inbox_ready(Inbox *self)
{
    if (self->items == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Inbox.__init__ was not called");
        return 0;
    }
    return 1;
}

/* Drop the consumed front of the list once it is at least half of it. */
static int
inbox_compact(Inbox *self)
{
    Py_ssize_t size = PyList_GET_SIZE(self->items);
    if (self->head == 0 || self->head * 2 < size)
        return 0;
    if (self->head == size) {
        if (PyList_SetSlice(self->items, 0, size, NULL) < 0)
            return -1;
        self->head = 0;
        return 0;
    }
    Py_ssize_t live = size - self->head;
    memmove(self->texts, self->texts + self->head, (size_t)live);
    if (PyList_SetSlice(self->items, 0, self->head, NULL) < 0)
        return -1;
    self->head = 0;
    return 0;
}

/* Append one message; 1 if this append reached a limit while not paused (and pauses). */
static int
inbox_push(Inbox *self, PyObject *payload, int text)
{
    if (!inbox_ready(self))
        return -1;
    Py_ssize_t size = PyList_GET_SIZE(self->items);
    if (size >= self->texts_size) {
        Py_ssize_t grown = self->texts_size ? self->texts_size * 2 : 16;
        unsigned char *texts = PyMem_Realloc(self->texts, (size_t)grown);
        if (texts == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->texts = texts;
        self->texts_size = grown;
    }
    if (PyList_Append(self->items, payload) < 0)
        return -1;
    self->texts[size] = (unsigned char)(text != 0);
    self->bytes += PyBytes_GET_SIZE(payload);
    if (!self->paused
        && (size + 1 - self->head >= self->max_packets || self->bytes >= self->max_bytes)) {
        self->paused = 1;
        return 1;
    }
    return 0;
}

static int
Inbox_init(Inbox *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"max_packets", "max_bytes", NULL};
    Py_ssize_t max_packets, max_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nn", names, &max_packets, &max_bytes))
        return -1;
    if (max_packets < 1 || max_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "Inbox limits must be at least 1");
        return -1;
    }
    PyObject *items = PyList_New(0);
    if (items == NULL)
        return -1;
    Py_XSETREF(self->items, items);
    self->head = 0;
    self->bytes = 0;
    self->max_packets = max_packets;
    self->max_bytes = max_bytes;
    self->paused = 0;
    self->ready = 0;
    return 0;
}

static void
Inbox_dealloc(Inbox *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->items);
    PyMem_Free(self->texts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Inbox_traverse(Inbox *self, visitproc visit, void *arg)
{
    Py_VISIT(self->items);
    return 0;
}

static int
Inbox_clear_refs(Inbox *self)
{
    Py_CLEAR(self->items);
    return 0;
}

static Py_ssize_t
Inbox_length(Inbox *self)
{
    return self->items == NULL ? 0 : inbox_len(self);
}

static PyObject *
Inbox_push_method(Inbox *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "push(payload: bytes, text: bool)");
        return NULL;
    }
    int text = PyObject_IsTrue(args[1]);
    if (text < 0)
        return NULL;
    int reached = inbox_push(self, args[0], text);
    if (reached < 0)
        return NULL;
    return PyBool_FromLong(reached);
}

static PyObject *
Inbox_pop(Inbox *self, PyObject *unused)
{
    if (!inbox_ready(self))
        return NULL;
    if (inbox_len(self) == 0)
        Py_RETURN_NONE;
    PyObject *payload = PyList_GET_ITEM(self->items, self->head);
    PyObject *result = PyTuple_New(2);
    if (result == NULL)
        return NULL;
    Py_INCREF(payload);
    PyTuple_SET_ITEM(result, 0, payload);
    PyObject *text = self->texts[self->head] ? Py_True : Py_False;
    Py_INCREF(text);
    PyTuple_SET_ITEM(result, 1, text);
    /* The list keeps its reference until the compaction drops the consumed front. */
    self->bytes -= PyBytes_GET_SIZE(payload);
    Py_INCREF(Py_None);
    PyList_SET_ITEM(self->items, self->head, Py_None);
    Py_DECREF(payload); /* the tuple holds it now */
    self->head++;
    if (inbox_compact(self) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *
Inbox_take(Inbox *self, PyObject *unused)
{
    /* Every payload, oldest first, and the text flag of the last one (False if none). */
    if (!inbox_ready(self))
        return NULL;
    Py_ssize_t size = PyList_GET_SIZE(self->items);
    int last_text = size > self->head ? self->texts[size - 1] : 0;
    PyObject *taken;
    if (self->head == 0) {
        taken = self->items;
        self->items = PyList_New(0);
        if (self->items == NULL) {
            self->items = taken;
            return NULL;
        }
    }
    else {
        taken = PyList_GetSlice(self->items, self->head, size);
        if (taken == NULL || PyList_SetSlice(self->items, 0, size, NULL) < 0) {
            Py_XDECREF(taken);
            return NULL;
        }
    }
    self->head = 0;
    self->bytes = 0;
    return Py_BuildValue("(NO)", taken, last_text ? Py_True : Py_False);
}

static PyObject *
Inbox_clear_method(Inbox *self, PyObject *unused)
{
    if (!inbox_ready(self))
        return NULL;
    if (PyList_SetSlice(self->items, 0, PyList_GET_SIZE(self->items), NULL) < 0)
        return NULL;
    self->head = 0;
    self->bytes = 0;
    Py_RETURN_NONE;
}

static PyMethodDef Inbox_methods[] = {
    {"push", (PyCFunction)(void (*)(void))Inbox_push_method, METH_FASTCALL,
     "push(payload, text) -> bool: append; True if a limit was reached now (paused set)"},
    {"pop", (PyCFunction)Inbox_pop, METH_NOARGS,
     "pop() -> (payload, was_text), or None when empty"},
    {"take", (PyCFunction)Inbox_take, METH_NOARGS,
     "take() -> (payloads, last_was_text): every message, oldest first; empties the inbox"},
    {"clear", (PyCFunction)Inbox_clear_method, METH_NOARGS, "drop every message"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Inbox_members[] = {
    {"bytes", T_PYSSIZET, offsetof(Inbox, bytes), READONLY, "payload bytes queued"},
    {"max_packets", T_PYSSIZET, offsetof(Inbox, max_packets), READONLY, "the packet limit"},
    {"max_bytes", T_PYSSIZET, offsetof(Inbox, max_bytes), READONLY, "the byte limit"},
    {"paused", T_BOOL, offsetof(Inbox, paused), 0, "the reader was asked to stop reading"},
    {"ready", T_BOOL, offsetof(Inbox, ready), 0, "listed in this poll's ready peers"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods Inbox_as_sequence = {
    .sq_length = (lenfunc)Inbox_length,
};

static PyTypeObject InboxType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wsfleet.ipc._inbox.Inbox",
    .tp_doc = "Inbox(max_packets, max_bytes): one peer's received messages (see inbox.py)",
    .tp_basicsize = sizeof(Inbox),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Inbox_init,
    .tp_dealloc = (destructor)Inbox_dealloc,
    .tp_traverse = (traverseproc)Inbox_traverse,
    .tp_clear = (inquiry)Inbox_clear_refs,
    .tp_methods = Inbox_methods,
    .tp_members = Inbox_members,
    .tp_as_sequence = &Inbox_as_sequence,
};

static PyObject *str_inbox;

/*
 * deliver(records, start, channels, text_kind, binary_kind, handlers, ready, pause)
 *   -> (index, failed_handler, exception)
 *
 * handlers: a list called per message with the peer id (None: per-peer mode,
 * where each peer with new messages is appended once to `ready`).  `pause`
 * is called with the id of a peer whose inbox has just reached a limit, at
 * once (before the handlers of that message: a read of theirs may resume).  Returns at the
 * first record from `start` on that is not a message (index < len, failed
 * -1), at the end (index == len), or when handler number `failed` raised on
 * record `index` (its exception, cleared, is the third item).
 */
static PyObject *
deliver(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "deliver(records, start, channels, text_kind, binary_kind, handlers, "
                        "ready, pause)");
        return NULL;
    }
    PyObject *records = args[0];
    Py_ssize_t index = PyLong_AsSsize_t(args[1]);
    PyObject *channels = args[2];
    long text_kind = PyLong_AsLong(args[3]);
    long binary_kind = PyLong_AsLong(args[4]);
    PyObject *handlers = args[5];
    PyObject *ready = args[6];
    PyObject *pause = args[7];
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(records) || !PyDict_Check(channels) || !PyList_Check(ready)
        || !PyCallable_Check(pause) || (handlers != Py_None && !PyList_Check(handlers))) {
        PyErr_SetString(PyExc_TypeError, "deliver: records, ready (and handlers) are lists, "
                                         "channels a dict, pause a callable");
        return NULL;
    }
    int per_message = handlers != Py_None;
    for (; index < PyList_GET_SIZE(records); index++) {
        PyObject *record = PyList_GET_ITEM(records, index);
        if (!PyTuple_CheckExact(record) || PyTuple_GET_SIZE(record) != 4)
            break;
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(record, 0));
        if (kind != text_kind && kind != binary_kind) {
            PyErr_Clear();
            break;
        }
        PyObject *peer = PyTuple_GET_ITEM(record, 1);
        PyObject *payload = PyTuple_GET_ITEM(record, 3);
        if (!PyBytes_Check(payload))
            break; /* not what pop_records makes: the caller's Python path decides */
        PyObject *channel = PyDict_GetItemWithError(channels, peer);
        if (channel == NULL) {
            if (PyErr_Occurred())
                return NULL;
            continue; /* gone already */
        }
        Py_INCREF(channel);
        PyObject *inbox = PyObject_GetAttr(channel, str_inbox);
        Py_DECREF(channel);
        if (inbox == NULL)
            return NULL;
        if (!PyObject_TypeCheck(inbox, &InboxType)) {
            Py_DECREF(inbox);
            PyErr_SetString(PyExc_TypeError, "deliver: a channel's inbox is not an Inbox");
            return NULL;
        }
        Inbox *queue = (Inbox *)inbox;
        int reached = inbox_push(queue, payload, kind == text_kind);
        if (reached < 0) {
            Py_DECREF(inbox);
            return NULL;
        }
        if (reached) {
            /* Now, before the handlers: what they do (a read that resumes) comes after. */
            PyObject *result = PyObject_CallOneArg(pause, peer);
            if (result == NULL) {
                Py_DECREF(inbox);
                return NULL;
            }
            Py_DECREF(result);
        }
        if (!per_message) {
            int fresh = !queue->ready;
            queue->ready = 1;
            Py_DECREF(inbox);
            if (fresh && PyList_Append(ready, peer) < 0)
                return NULL;
            continue;
        }
        Py_DECREF(inbox);
        /* By index: a handler may connect or disconnect handlers. */
        Py_INCREF(peer);
        for (Py_ssize_t h = 0; h < PyList_GET_SIZE(handlers); h++) {
            PyObject *handler = PyList_GET_ITEM(handlers, h);
            Py_INCREF(handler);
            PyObject *result = PyObject_CallOneArg(handler, peer);
            Py_DECREF(handler);
            if (result == NULL) {
                Py_DECREF(peer);
                if (!PyErr_ExceptionMatches(PyExc_Exception))
                    return NULL; /* KeyboardInterrupt, SystemExit: out of poll() */
                PyObject *type, *exc, *traceback;
                PyErr_Fetch(&type, &exc, &traceback);
                PyErr_NormalizeException(&type, &exc, &traceback);
                if (traceback != NULL)
                    PyException_SetTraceback(exc, traceback);
                Py_XDECREF(type);
                Py_XDECREF(traceback);
                return Py_BuildValue("(nnN)", index, h, exc);
            }
            Py_DECREF(result);
        }
        Py_DECREF(peer);
    }
    return Py_BuildValue("(niO)", index, -1, Py_None);
}

/* bytes_total(payloads: list) -> int: their summed length, or -1 if one is not exactly bytes. */
static PyObject *
bytes_total(PyObject *module, PyObject *payloads)
{
    if (!PyList_Check(payloads))
        return PyLong_FromLong(-1);
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(payloads); i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_CheckExact(payload))
            return PyLong_FromLong(-1);
        total += PyBytes_GET_SIZE(payload);
    }
    return PyLong_FromSsize_t(total);
}

/* append_commands(backlog, kind, peer, payloads): backlog += [(kind, peer, 0, p) for p in
 * payloads], for a list of payloads. */
static PyObject *
append_commands(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_Check(args[0]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "append_commands(backlog: list, kind, peer, payloads: list)");
        return NULL;
    }
    PyObject *backlog = args[0], *kind = args[1], *peer = args[2], *payloads = args[3];
    PyObject *flags = PyLong_FromLong(0);
    if (flags == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(payloads); i++) {
        PyObject *record = PyTuple_Pack(4, kind, peer, flags, PyList_GET_ITEM(payloads, i));
        if (record == NULL || PyList_Append(backlog, record) < 0) {
            Py_XDECREF(record);
            Py_DECREF(flags);
            return NULL;
        }
        Py_DECREF(record);
    }
    Py_DECREF(flags);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bytes_total", (PyCFunction)bytes_total, METH_O,
     "bytes_total(payloads) -> int: the summed length of a list of bytes, -1 if one is not bytes"},
    {"append_commands", (PyCFunction)(void (*)(void))append_commands, METH_FASTCALL,
     "append_commands(backlog, kind, peer, payloads): one (kind, peer, 0, payload) per payload"},
    {"deliver", (PyCFunction)(void (*)(void))deliver, METH_FASTCALL,
     "deliver(records, start, channels, text_kind, binary_kind, handlers, ready, pause) -> "
     "(index, failed_handler, exception)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef inbox_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsfleet.ipc._inbox",
    .m_doc = "A peer's inbox and the loop that fills the inboxes from ring records (inbox.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__inbox(void)
{
    if (PyType_Ready(&InboxType) < 0)
        return NULL;
    str_inbox = PyUnicode_InternFromString("inbox");
    if (str_inbox == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&inbox_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&InboxType);
    if (PyModule_AddObject(module, "Inbox", (PyObject *)&InboxType) < 0) {
        Py_DECREF(&InboxType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
