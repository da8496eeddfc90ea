"""A profile's environment, replayed from its lock with no solver: where it is
(`location`), the checked files it is made of (`inputs`), the tools that make it
(`backends`), how a process runs inside it (`runtime`), and the build (`build`).
The env stage (`stages/env.py`) and `sdrecipe env` use them."""
