"""Command line: ``sage-dist`` (:mod:`sage_dist.cli.main`) and its sub-commands, one module each; the grid-study
scripts' command line (:mod:`sage_dist.cli.studies`) and the search studies' (:mod:`sage_dist.cli.study`)."""
