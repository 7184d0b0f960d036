"""The online half: a FastAPI service answering text->image and image->text searches.

Build it with `app.main.create_app(settings, resources)`; `uvicorn app.main:app` serves the default.
It imports the shared core (`clipsearch`) and never the offline pipeline.
"""
