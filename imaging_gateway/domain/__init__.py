"""Records and query objects of the study index; pure data, no I/O."""
