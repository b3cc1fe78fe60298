"""Page scripts of the Tango app, run by st.navigation (not imported)."""
