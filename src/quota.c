/*  quota.c -- hard limits and monthly usage counters.

    Both tables are zhashx maps over binary keys (customer and meter may hold
    any UTF-8, NUL included): [u16 length][clen][customer][mlen][meter]
    [period u64] for usage, the same without the period for limits. */
#include <czmq.h>
#include "tally/quota.h"

#define KEY_MAX (2 + 1 + TLY_CUSTOMER_MAX + 1 + TLY_METER_MAX + 8)

/*  A usage row holds its own key, which the usage table points at (no
    copy), and whether it changed since the last checkpoint. */
typedef struct {
    uint64_t used;
    bool dirty;
    uint8_t key[];
} usage_t;

struct tly_quota {
    zhashx_t *limits;       /* key -> uint64_t *limit                */
    zhashx_t *usage;        /* usage_t.key -> usage_t                */
    usage_t **dirty;        /* rows changed since tly_quota_clean    */
    size_t ndirty;
    size_t dirty_cap;
};

typedef struct {
    uint8_t b[KEY_MAX];
} qkey;

static size_t
key_len (const void *k)
{
    const uint8_t *p = k;
    return (size_t) p[0] << 8 | p[1];
}

static size_t
key_hash (const void *k)
{
    const uint8_t *p = k;
    size_t h = 14695981039346656037u;         /* FNV-1a */
    for (size_t i = 0, n = key_len (k); i < n; i++)
        h = (h ^ p[i]) * 1099511628211u;
    return h;
}

static int
key_cmp (const void *a, const void *b)
{
    size_t la = key_len (a), lb = key_len (b);
    return la != lb ? (la < lb ? -1 : 1) : memcmp (a, b, la);
}

static void *
key_dup (const void *k)
{
    void *copy = malloc (key_len (k));
    if (copy)
        memcpy (copy, k, key_len (k));
    return copy;
}

static void
key_free (void **k)
{
    free (*k);
    *k = NULL;
}

static void
val_free (void **v)
{
    free (*v);
    *v = NULL;
}

static void
key_make (qkey *k, const tly_str *customer, const tly_str *meter, bool with_period,
          uint64_t period)
{
    assert (customer->len <= TLY_CUSTOMER_MAX && meter->len <= TLY_METER_MAX);
    size_t n = 2;
    k->b[n++] = (uint8_t) customer->len;
    memcpy (k->b + n, customer->ptr, customer->len);
    n += customer->len;
    k->b[n++] = (uint8_t) meter->len;
    memcpy (k->b + n, meter->ptr, meter->len);
    n += meter->len;
    if (with_period) {
        memcpy (k->b + n, &period, 8);
        n += 8;
    }
    k->b[0] = (uint8_t) (n >> 8);
    k->b[1] = (uint8_t) n;
}

static void
key_split (const void *key, tly_str *customer, tly_str *meter, uint64_t *period)
{
    const uint8_t *p = key;
    size_t n = 2;
    customer->len = p[n++];
    customer->ptr = (const char *) p + n;
    n += customer->len;
    meter->len = p[n++];
    meter->ptr = (const char *) p + n;
    n += meter->len;
    if (period)
        memcpy (period, p + n, 8);
}

static zhashx_t *
table_new (void)
{
    zhashx_t *t = zhashx_new ();
    if (t) {
        zhashx_set_key_hasher (t, key_hash);
        zhashx_set_key_comparator (t, key_cmp);
        zhashx_set_key_duplicator (t, key_dup);
        zhashx_set_key_destructor (t, key_free);
        zhashx_set_destructor (t, val_free);
    }
    return t;
}

int
tly_quota_new (tly_quota **out)
{
    tly_quota *self = calloc (1, sizeof *self);
    if (!self)
        return TLY_ENOMEM;
    self->limits = table_new ();
    self->usage = table_new ();
    if (self->usage) {
        zhashx_set_key_duplicator (self->usage, NULL);
        zhashx_set_key_destructor (self->usage, NULL);
    }
    if (!self->limits || !self->usage) {
        tly_quota_destroy (&self);
        return TLY_ENOMEM;
    }
    *out = self;
    return TLY_OK;
}

void
tly_quota_destroy (tly_quota **self_p)
{
    tly_quota *self = *self_p;
    if (self) {
        zhashx_destroy (&self->limits);
        zhashx_destroy (&self->usage);
        free (self->dirty);
        free (self);
        *self_p = NULL;
    }
}

/*  Days since 1970-01-01 to civil date (H. Hinnant's algorithm). */
uint64_t
tly_period_of (uint64_t ts_ms)
{
    int64_t z = (int64_t) (ts_ms / 86400000u) + 719468;
    int64_t era = z / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t y = yoe + era * 400;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t m = mp < 10 ? mp + 3 : mp - 9;
    if (m <= 2)
        y++;
    return (uint64_t) y * 12 + (uint64_t) (m - 1);
}

void
tly_period_name (uint64_t period, char out[24])
{
    snprintf (out, 24, "%04llu-%02u", (unsigned long long) (period / 12),
              (unsigned) (period % 12) + 1);
}

int
tly_quota_set_limit (tly_quota *self, const tly_str *customer, const tly_str *meter,
                     bool limit_set, uint64_t limit)
{
    if (customer->len == 0 || customer->len > TLY_CUSTOMER_MAX
    ||  meter->len == 0 || meter->len > TLY_METER_MAX)
        return TLY_EINVAL;
    qkey k;
    key_make (&k, customer, meter, false, 0);
    if (!limit_set) {
        zhashx_delete (self->limits, k.b);
        return TLY_OK;
    }
    uint64_t *v = zhashx_lookup (self->limits, k.b);
    if (v) {
        *v = limit;
        return TLY_OK;
    }
    v = malloc (sizeof *v);
    if (!v)
        return TLY_ENOMEM;
    *v = limit;
    if (zhashx_insert (self->limits, k.b, v)) {
        free (v);
        return TLY_ENOMEM;
    }
    return TLY_OK;
}

bool
tly_quota_limit_exact (tly_quota *self, const tly_str *customer, const tly_str *meter,
                       uint64_t *limit)
{
    if (customer->len > TLY_CUSTOMER_MAX || meter->len > TLY_METER_MAX)
        return false;
    qkey k;
    key_make (&k, customer, meter, false, 0);
    uint64_t *v = zhashx_lookup (self->limits, k.b);
    if (v)
        *limit = *v;
    return v != NULL;
}

bool
tly_quota_limit_for (tly_quota *self, const tly_str *customer, const tly_str *meter,
                     uint64_t *limit)
{
    if (zhashx_size (self->limits) == 0)
        return false;
    static const tly_str star = { "*", 1 };
    const tly_str *order[4][2] = {
        { customer, meter }, { customer, &star }, { &star, meter }, { &star, &star }
    };
    for (int i = 0; i < 4; i++) {
        qkey k;
        key_make (&k, order[i][0], order[i][1], false, 0);
        uint64_t *v = zhashx_lookup (self->limits, k.b);
        if (v) {
            *limit = *v;
            return true;
        }
    }
    return false;
}

uint64_t
tly_quota_used (tly_quota *self, const tly_str *customer, const tly_str *meter,
                uint64_t period)
{
    qkey k;
    key_make (&k, customer, meter, true, period);
    usage_t *u = zhashx_lookup (self->usage, k.b);
    return u ? u->used : 0;
}

static usage_t *
usage_slot (tly_quota *self, const qkey *k)
{
    usage_t *u = zhashx_lookup (self->usage, k->b);
    if (!u) {
        size_t len = key_len (k->b);
        u = calloc (1, sizeof *u + len);
        if (!u)
            return NULL;
        memcpy (u->key, k->b, len);
        if (zhashx_insert (self->usage, u->key, u)) {
            free (u);
            return NULL;
        }
    }
    return u;
}

/*  Records a change; false when the dirty list cannot grow (the row is
    then left unchanged by the caller). */
static bool
usage_touch (tly_quota *self, usage_t *u)
{
    if (u->dirty)
        return true;
    if (self->ndirty == self->dirty_cap) {
        size_t cap = self->dirty_cap ? 2 * self->dirty_cap : 256;
        usage_t **d = realloc (self->dirty, cap * sizeof *d);
        if (!d)
            return false;
        self->dirty = d;
        self->dirty_cap = cap;
    }
    self->dirty[self->ndirty++] = u;
    u->dirty = true;
    return true;
}

static void
usage_add (usage_t *u, uint64_t qty)
{
    u->used = u->used > UINT64_MAX - qty ? UINT64_MAX : u->used + qty;
}

bool
tly_quota_admit (tly_quota *self, const tly_str *customer, const tly_str *meter,
                 uint64_t ts, uint64_t qty, int *err)
{
    if (err)
        *err = TLY_OK;
    qkey k;
    key_make (&k, customer, meter, true, tly_period_of (ts));
    usage_t *u = usage_slot (self, &k);
    if (!u || !usage_touch (self, u)) {
        if (err)
            *err = TLY_ENOMEM;
        return false;
    }
    uint64_t limit;
    if (tly_quota_limit_for (self, customer, meter, &limit)
    &&  (qty > limit || u->used > limit - qty))
        return false;
    usage_add (u, qty);
    return true;
}

int
tly_quota_add (tly_quota *self, const tly_str *customer, const tly_str *meter,
               uint64_t period, uint64_t qty)
{
    qkey k;
    key_make (&k, customer, meter, true, period);
    usage_t *u = usage_slot (self, &k);
    if (!u || !usage_touch (self, u))
        return TLY_ENOMEM;
    usage_add (u, qty);
    return TLY_OK;
}

void
tly_quota_sub (tly_quota *self, const tly_str *customer, const tly_str *meter,
               uint64_t period, uint64_t qty)
{
    qkey k;
    key_make (&k, customer, meter, true, period);
    usage_t *u = zhashx_lookup (self->usage, k.b);
    assert (u && u->used >= qty);       /* only admitted usage is taken back */
    if (u && usage_touch (self, u))
        u->used = u->used >= qty ? u->used - qty : 0;
}

void
tly_quota_each_limit (tly_quota *self, tly_limit_fn *fn, void *ctx)
{
    for (uint64_t *v = zhashx_first (self->limits); v; v = zhashx_next (self->limits)) {
        tly_str c, m;
        key_split (zhashx_cursor (self->limits), &c, &m, NULL);
        fn (ctx, &c, &m, *v);
    }
}

size_t
tly_quota_limit_count (tly_quota *self)
{
    return zhashx_size (self->limits);
}

void
tly_quota_each_usage (tly_quota *self, tly_usage_fn *fn, void *ctx)
{
    for (usage_t *u = zhashx_first (self->usage); u; u = zhashx_next (self->usage)) {
        tly_str c, m;
        uint64_t period;
        key_split (u->key, &c, &m, &period);
        fn (ctx, &c, &m, period, u->used);
    }
}

void
tly_quota_each_dirty (tly_quota *self, tly_usage_fn *fn, void *ctx)
{
    for (size_t i = 0; i < self->ndirty; i++) {
        tly_str c, m;
        uint64_t period;
        key_split (self->dirty[i]->key, &c, &m, &period);
        fn (ctx, &c, &m, period, self->dirty[i]->used);
    }
}

size_t
tly_quota_dirty_count (tly_quota *self)
{
    return self->ndirty;
}

void
tly_quota_clean (tly_quota *self)
{
    for (size_t i = 0; i < self->ndirty; i++)
        self->dirty[i]->dirty = false;
    self->ndirty = 0;
}
