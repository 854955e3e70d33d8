"""What the tests are built from, other than fixtures (those live in the conftest files).

Each module holds one thing: :mod:`.waiting` (polling with a deadline),
:mod:`.servers` (server processes of ``tests.server_app``), :mod:`.clients`
(websocket clients), and so on. Test modules import from here; nothing here
imports a test module or a conftest.
"""
