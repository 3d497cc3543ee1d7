"""The embeddings path: the OpenAI request, then one request's phases in order (service.py runs them).

    request.py     the client's request, parsed and checked against the model table
    service.py     EmbeddingService: embed() as a sequence of the phases below; drain() at shutdown
    job.py         Job: one request's state, passed from phase to phase; outcome.py what the HTTP layer gets back
    digest.py      1. digest and de-duplicate: cache keys, each distinct input once
    tiers.py       2. the in-process and Redis tiers, read with the quota charge in the same round trip
    counting.py    3. count the misses' tokens and check the model's limits
    misses.py      4. settle (re-read, reserve) and fetch the misses: claim, send, wait, retry a shared failure
    calls.py       one upstream call and what the requests sharing it get; coalesce.py the in-flight table
    writeback.py   new entries written to the cache after the answer; background.py what outlives a request
    settlement.py  5. settle the ticket and record in the usage ledger
"""
