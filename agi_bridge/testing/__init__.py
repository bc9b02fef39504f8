"""Tools to try and test the bridge without a PBX or a NoojeeContact: the NoojeeContact
simulator, a fake Asterisk that runs one AGI session, and the demo that joins them to a bridge.
Nothing in the running service imports them; the CLI loads them only for the commands that use
them (``demo``, ``simulate-noojee``, ``fake-call``), and other projects' tests may import the
simulator."""
