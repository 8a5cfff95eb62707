"""Exit statuses of `diffbox run` and `diffbox chat`, shared by cli.py and display.py.

0 done; 1 the job failed (or an output's checksum did not match, or the endpoint could not
be used); 2 a bad request, refused before it was sent; 124 `--timeout` ran out (the job goes
on); 130 interrupted (Ctrl-C cancels the job where the endpoint can).
"""

EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 124, 130
