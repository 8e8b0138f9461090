"""The local rehearsal fleet: real hosts (sshd + dockerd each) in namespaces on this machine."""
