"""The embedded engine: `Engine` and its sync facade, dispatcher, monitor, stats, dead letters.

Import `Engine` from `engine`; this package is loaded on first use, so the CLI
and the config checks start without the process machinery.
"""
