"""The service around the ML core: state in SQL, jobs and sweeps, settings, files, the
command line."""
