"""The supervisor process: forks the shards and keeps them alive.

Owns: spawning, reaping and restarting shards (back-off, crash-loop limit),
telling the front about deaths, and server-wide status.  Started as a fresh
interpreter, never a fork of the user's process.  Imports only `wsfleet.ipc`.
"""
