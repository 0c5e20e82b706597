"""Wire protocol: control requests/replies, error codes, batch framing.

Shared by broker, collectors and clients; imports no process package.
"""
