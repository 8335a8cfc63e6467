"""`mot serve`: a local web page that streams a checkpoint's generations (mot/serve/app.py)."""
