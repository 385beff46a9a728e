"""Phones for testing: emulated-phone processes, link shaping, adb deploy and the probe."""
