"""The application: the ``splitserve`` command line (``app.cli``, one module per subcommand in
``app.commands``), the assembly of a serving process (``app.server``: cluster + router + gRPC
and HTTP servers) and the load generator (``app.loadgen``). It sits on top of every other
package; nothing below imports it (``cluster`` does not import ``router``)."""
