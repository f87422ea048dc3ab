"""Files as every part of the package writes and reads them: atomic publishing of files and
directories and the one-line `WriteError` when the file system refuses one (`fsio`), one writer per
directory (`lock`), JSON read as every reader of a user's file reads it (`jsonio`), and the only
module that knows external files, fetched by sha256 from a mirror, a cache, a URL or PyPI (`assets`),
every download retried, resumed and checked (`download`), and the Hugging Face hub (`hub`).
Nothing here knows about models, configs or training."""
