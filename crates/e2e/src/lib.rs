//! End-to-end tests live in `tests/`: they boot the real `pixmesh up` (every role a separate
//! process on 127.0.0.1, ports chosen by the OS) and drive it over HTTP like a client would.
