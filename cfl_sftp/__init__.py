"""cfl-sftp: the Centralised Firmware Library for GB smart metering, served over SFTP."""

__version__ = "0.1.0"
