"""The web console's static files (`static/`), served by the management server at /console/
(tcm/server/console.py). Plain ES modules and CSS: nothing to build."""
