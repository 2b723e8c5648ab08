"""Event-loop runtimes of the asynchronous shells (design guide, section 4.6).

Today asyncio only (:mod:`afunix._backends.asyncio`); trio comes later.
"""
