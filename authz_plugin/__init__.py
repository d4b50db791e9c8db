"""FDCS authorization plugin: the enforcement point of the service.

Pure modules: ``request`` (canonicalisation), ``gojson`` and ``shapes`` (Go
body decoding), ``endpoints`` (the policy table), ``rules`` (body rules),
``scoping`` (the naming scheme).  I/O modules: ``identity`` (Keystone),
``ownership`` (Redis), ``app``/``server`` (the plugin protocol under
gunicorn).  ``policy`` joins them.  Tools: ``login`` (``fdcs-login``) and
``devstack`` (``fdcs-devstack``).
"""
