"""Foundation utilities every layer may use: atomic writes (``atomic``) and named random streams
(``seeding``). They import nothing from vidpo.
"""
