/*  actors.h -- the four actors of tallyd and what each is handed.

    tallyd (actors/tallyd.c) opens the store, loads the log key, creates the
    inproc links (PAIR pairs) and the API socket, and hands each actor its
    ends through these structs.  Sockets and the store outlive any one
    generation of an actor; everything else an actor owns it creates at
    start and frees at exit, so a restart starts from the durable store.
*/
#ifndef TALLY_ACTORS_H
#define TALLY_ACTORS_H

#include <stdatomic.h>
#include <czmq.h>
#include "supervisor.h"
#include "tally/store.h"
#include "tally/sth.h"

/*  The message of `too_large` for a request over request_max, on the API
    (ingest) and on the control endpoint (tallyd). */
#define TLY_TOO_LARGE_MESSAGE "the request is larger than the maximum request size"

typedef struct {
    const char *data_dir;
    tly_store *store;
    uint8_t pk[TLY_PK_LEN];
    uint8_t sk[TLY_SK_LEN];
    size_t request_max;           /* bytes; larger requests get too_large      */
    size_t group_max;             /* events per commit, at most                */
    unsigned verify_interval_s;   /* a full scrub pass at least this often     */
    unsigned verify_cpu;          /* ... using at most this % of a core (1-100) */
    unsigned verify_nice;         /* the scrubber's nice, 0-19; 20: idle class */

    zsock_t *api;                 /* ROUTER: the API endpoint (ingest)         */
    zsock_t *ingest_receipt[2];   /* PAIR link: [0] ingest end, [1] receipt end */
    zsock_t *ingest_quota[2];     /* [0] ingest end, [1] quota end             */
    zsock_t *receipt_quota[2];    /* [0] receipt end, [1] quota end            */
    /*  Who serves the API socket: ingest, or (while ingest is down) tallyd's
        main thread, answering `unavailable`.  Ingest sends RETURN when it
        exits and TAKE when a later generation starts; main answers GIVEN.
        api_returned is touched only by ingest generations, one at a time. */
    zsock_t *api_token[2];        /* [0] main end, [1] ingest end              */
    bool api_returned;
    /*  The receipt actor's last admission ticket, kept across its
        generations (one at a time) so a late verdict for an earlier
        generation's ticket never passes for a new one's. */
    uint64_t receipt_ticket;
    /*  Events the ingest actor looked up in the index's runs before the
        writer, and those it found there (status: index.ingest_asked,
        index.ingest_found); read by tallyd's main thread. */
    atomic_uint_least64_t ingest_asked, ingest_found;
} tly_actor_env;

int tly_receipt_actor (tly_child_ctx *ctx, void *env);
int tly_quota_actor (tly_child_ctx *ctx, void *env);
int tly_reconcile_actor (tly_child_ctx *ctx, void *env);
int tly_ingest_actor (tly_child_ctx *ctx, void *env);

#endif
