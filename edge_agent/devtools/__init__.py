"""What development and demonstration use, apart from the agent itself: `edge-agent bench` (bench.py),
random-weight test models (testmodels.py), the synthetic kiosk scenes (scenes.py), `edge-agent demo`
(demo.py) and the loopback broker the demo and benchmarks start (loopback.py).

`edge-agent run` and `edge-agent ask` never import this package.
"""
