"""What every feature stands on and no feature owns: file storage and atomic writes, disk-full
detection, Socket.IO events (``socket_events`` defines them), remote file transfers with their
limits, worker threads. Not to be confused with a feature's ``service.py`` (its use cases)."""
