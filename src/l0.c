/*  l0.c -- L0 of the idempotency index, in memory (see l0.h). */
#include <stdlib.h>
#include <string.h>
#include "l0.h"

void
l0_free (dx_l0 *self)
{
    free (self->keys);
    free (self->slots);
    memset (self, 0, sizeof *self);
}

uint64_t
l0_end (const dx_l0 *self)
{
    return self->from + self->n;
}

/*  Keys are keyed hashes (or, in tests, random): their first bytes are
    already uniform. */
static size_t
slot_of (const uint8_t key[TLY_DEDUP_LEN], size_t nslots)
{
    uint64_t h;
    memcpy (&h, key, 8);
    return (size_t) h & (nslots - 1);
}

/*  A slot holds i + 1 in its low half and key bytes 8..11 in its high
    half: a lookup of an absent key (most of them) then reads only the
    table, not keys[], which at 128K keys is mostly out of cache. */
static uint64_t
tag_of (const uint8_t key[TLY_DEDUP_LEN])
{
    uint32_t t;
    memcpy (&t, key + 8, 4);
    return (uint64_t) t << 32;
}

static void
index_key (dx_l0 *self, size_t i)
{
    size_t s = slot_of (self->keys[i], self->nslots);
    while (self->slots[s])
        s = (s + 1) & (self->nslots - 1);
    self->slots[s] = tag_of (self->keys[i]) | ((uint64_t) i + 1);
}

/*  Rebuilds the table for keys[0 .. n), with room for at least `need`. */
static int
reindex (dx_l0 *self, size_t need)
{
    size_t nslots = self->nslots ? self->nslots : 1024;
    while (nslots < 2 * need + 2)
        nslots *= 2;
    if (nslots != self->nslots) {
        uint64_t *slots = malloc (nslots * sizeof *slots);
        if (!slots)
            return TLY_ENOMEM;
        free (self->slots);
        self->slots = slots;
        self->nslots = nslots;
    }
    memset (self->slots, 0, self->nslots * sizeof *self->slots);
    for (size_t i = 0; i < self->n; i++)
        index_key (self, i);
    return TLY_OK;
}

int
l0_find (const dx_l0 *self, const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq)
{
    if (!self->nslots)
        return TLY_ENOTFOUND;
    uint64_t tag = tag_of (key);
    for (size_t s = slot_of (key, self->nslots); self->slots[s];
         s = (s + 1) & (self->nslots - 1)) {
        if ((self->slots[s] & 0xffffffff00000000ull) != tag)
            continue;
        uint32_t i = (uint32_t) self->slots[s] - 1;
        if (memcmp (self->keys[i], key, TLY_DEDUP_LEN) == 0) {
            *seq = self->from + i;
            return TLY_OK;
        }
    }
    return TLY_ENOTFOUND;
}

void
l0_prefetch (const dx_l0 *self, const uint8_t key[TLY_DEDUP_LEN])
{
#if defined(__GNUC__)
    if (self->nslots)
        __builtin_prefetch (&self->slots[slot_of (key, self->nslots)]);
#else
    (void) self;
    (void) key;
#endif
}

int
l0_push (dx_l0 *self, const uint8_t key[TLY_DEDUP_LEN])
{
    if (self->n >= UINT32_MAX - 1)
        return TLY_ETOOLARGE;
    if (self->n == self->cap) {
        size_t cap = self->cap ? self->cap * 2 : 1024;
        void *keys = realloc (self->keys, cap * sizeof *self->keys);
        if (!keys)
            return TLY_ENOMEM;
        self->keys = keys;
        self->cap = cap;
    }
    if (2 * (self->n + 1) + 2 > self->nslots && reindex (self, self->n + 1))
        return TLY_ENOMEM;
    memcpy (self->keys[self->n], key, TLY_DEDUP_LEN);
    index_key (self, self->n++);
    return TLY_OK;
}

int
l0_sync (dx_l0 *self, MDB_txn *txn, uint64_t from, uint64_t end,
         dx_key_fn *key_of, void *ctx)
{
    if (from > end)
        return TLY_ECORRUPT;
    bool changed = false;
    if (from < self->from || from > l0_end (self)) {
        self->from = from;          /* nothing held is of use */
        self->n = 0;
        changed = true;
    }
    if (from > self->from) {        /* a flush moved keys into a run */
        size_t drop = (size_t) (from - self->from);
        memmove (self->keys, self->keys + drop, (self->n - drop) * sizeof *self->keys);
        self->n -= drop;
        self->from = from;
        changed = true;
    }
    if (end < l0_end (self)) {      /* a txn that appended them aborted */
        self->n = (size_t) (end - from);
        changed = true;
    }
    int err = changed ? reindex (self, self->n) : TLY_OK;
    uint8_t key[TLY_DEDUP_LEN];
    for (uint64_t seq = l0_end (self); seq < end && !err; seq++)
        if (!(err = key_of (ctx, txn, seq, key)))
            err = l0_push (self, key);
    if (err) {
        self->n = 0;
        if (self->nslots)
            memset (self->slots, 0, self->nslots * sizeof *self->slots);
    }
    return err;
}

/*  A bucket sort on the keys' top bits, then insertion sort inside each
    bucket: keys are uniform hashes, so buckets hold about one key each.
    One counting pass and one scatter: 131072 keys take 2.5-4 ms here,
    where an 8-pass radix sort took 8-12 ms, a stall in the commit that
    freezes L0.  Buckets grow with the count, so an L0 tuned far larger
    stays linear (with 16-bit buckets, 1M keys took 104 ms). */
/*  The bucket of key: its top `bits` bits. */
static size_t
bucket_of (const uint8_t key[TLY_DEDUP_LEN], unsigned bits)
{
    uint32_t top = (uint32_t) key[0] << 24 | (uint32_t) key[1] << 16
                 | (uint32_t) key[2] << 8 | key[3];
    return top >> (32 - bits);
}

int
l0_sorted (const dx_l0 *self, size_t count, dx_rec **out)
{
    if (count > self->n)
        count = self->n;
    unsigned bits = 8;              /* about one key a bucket, up to 16M buckets */
    while (bits < 24 && ((size_t) 1 << bits) < count)
        bits++;
    size_t nb = (size_t) 1 << bits;
    dx_rec *a = malloc ((count ? count : 1) * sizeof *a);
    size_t *at = calloc (nb + 1, sizeof *at);
    if (!a || !at) {
        free (a);
        free (at);
        return TLY_ENOMEM;
    }
    for (size_t i = 0; i < count; i++)
        at[bucket_of (self->keys[i], bits) + 1]++;
    for (size_t d = 0; d < nb; d++)
        at[d + 1] += at[d];
    for (size_t i = 0; i < count; i++) {
        dx_rec *r = &a[at[bucket_of (self->keys[i], bits)]++];
        memcpy (r->key, self->keys[i], TLY_DEDUP_LEN);
        r->seq = self->from + i;
    }
    free (at);
    /*  Buckets are in order; keys inside one are not. */
    for (size_t i = 1; i < count; i++)
        for (size_t j = i; j > 0 && memcmp (a[j - 1].key, a[j].key, TLY_DEDUP_LEN) > 0; j--) {
            dx_rec t = a[j];
            a[j] = a[j - 1];
            a[j - 1] = t;
        }
    *out = a;
    return TLY_OK;
}
