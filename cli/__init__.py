"""gradscope's command line (installed as ``gradscope.cli``); thin click commands over the library."""
