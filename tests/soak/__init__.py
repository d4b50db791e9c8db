"""The soak: ``python3 -m tests.soak --minutes 30 [--tenants 8] [--hosts 2]``
(see ``__main__.py``).  Not a pytest module: nothing here is collected."""
