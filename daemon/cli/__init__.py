"""The command-line tools: fssconfig, vssadm, appvss, and what they share (the
control client, the store opener that runs with the caller's own rights)."""
