"""The domain core: packages, the gateway's verdicts, entitlement, vault crypto and the audit tree.

Nothing in this package performs network I/O or knows of SSH or SQL: it takes bytes and values and returns
verified objects or raises the narrowest :class:`~cfl_sftp.domain.errors.GatewayRejection`. The adapters
(``storage``, ``sftp``, ``cli``) translate between it and the outside world.
"""
