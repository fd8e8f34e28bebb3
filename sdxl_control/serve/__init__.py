"""``sdxl-control serve``: the A1111 web API and OpenAI's images API, a front-end that translates each request into
one job for the one runner (:mod:`sdxl_control.serve.app`); on one machine, or as a Ray Serve deployment."""
