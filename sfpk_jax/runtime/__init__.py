"""Where the library runs: the cores it may use, and progress bars fit for the output."""
