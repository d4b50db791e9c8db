"""FDCS name scoper: the tenants' TLS front door (see ARCHITECTURE.md).

It reuses ``authz_plugin.identity``, ``authz_plugin.ownership`` and
``authz_plugin.scoping``; the plugin never imports from here.
"""
