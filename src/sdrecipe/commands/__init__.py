"""One module per `sdrecipe` verb, as pipx has it: each turns the command's explicit
keyword arguments into engine calls and shows the outcome through `console`. They never
see argparse (cli.py parses) and never catch `SdrecipeError` (cli.main does, once)."""
