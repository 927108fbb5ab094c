"""Plumbing shared by several test folders: server settings for loopback servers and a TCP relay."""
