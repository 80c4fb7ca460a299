"""Policy training with a chosen optimizer: loop, optimizer specs, reports.

See ``service/commands/robotics.py`` for the ``mnemosyne robotics`` command.
"""
