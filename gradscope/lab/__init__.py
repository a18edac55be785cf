"""The lab that trains the bundled references: models, built-in tasks, the trainer and presets.

Built on the recording core like any user's training script; nothing in the core imports it.
"""
