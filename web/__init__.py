"""Static files of the browser demo and the JavaScript SDK, served at ``/``."""
