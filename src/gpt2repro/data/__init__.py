"""`gpt2repro prepare` and the batches training reads: llm.c token shards (`shards`), resumable
(shard, window) batches (`loader`), a corpus's readers (`sources`, a streamed data set: `stream`), the shards being filled with
the manifest a resume starts from (`sink`), corpus → shards (`prepare`), shards tokenized already
(`hubshards`), and conversations → packed rows with loss masks (`conversations`, from `records`)."""
