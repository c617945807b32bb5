"""What commands ask of a running run's conductor, each piece owning its state:
`swaps` (`podpipe swap`, `apply`), `lending` (`podpipe peek`), `shadows` (`podpipe
shadow`, `promote`: a stage's candidate run beside it)."""
