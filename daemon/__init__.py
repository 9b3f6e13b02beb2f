"""rembgd: a background-removal daemon for photo studios."""
__version__ = "0.1.0"
