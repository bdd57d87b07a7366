"""pyserver: a messaging back end in the shape of the Facebook Messages back end."""

__version__ = "0.1.0"
