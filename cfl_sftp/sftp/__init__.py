"""The SFTP layer: asyncssh server, authentication and each user's virtual tree over the domain core."""
