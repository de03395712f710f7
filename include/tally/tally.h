/*  tally.h -- common definitions of the Tally core library.

    Every function in the library returns an int status: TLY_OK (0) on
    success, or one of the negative TLY_E* codes below.  Functions do not
    print; callers decide what to log.  Unless a header says otherwise, an
    object may be used by one thread at a time.
*/
#ifndef TALLY_TALLY_H
#define TALLY_TALLY_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define TLY_VERSION "0.1.0"

enum {
    TLY_OK        =   0,
    TLY_EINVAL    =  -1,   /* input breaks a rule (bad field, bad encoding)     */
    TLY_ETOOLARGE =  -2,   /* input exceeds a size or count limit               */
    TLY_ENOTFOUND =  -3,   /* no such entry, node, key or file                  */
    TLY_EIO       =  -4,   /* the file system or LMDB failed                    */
    TLY_ENOMEM    =  -5,   /* allocation failed                                 */
    TLY_ECORRUPT  =  -6,   /* stored bytes do not match their hash              */
    TLY_EUNAVAIL  =  -7,   /* a needed actor is stopped or overloaded: retry    */
    TLY_ETIMEOUT  =  -8,   /* no answer in time                                 */
    TLY_ECRYPTO   =  -9,   /* a signature or proof does not verify              */
    TLY_EPROTO    = -10,   /* a peer broke the wire protocol                    */
    TLY_ESERVER   = -11,   /* the server replied with an error (see its code)   */
    TLY_EEXIST    = -12,   /* already exists                                    */
};

/*  Returns a static, human-readable name for a status code. */
const char *tly_strerror (int rc);

/*  Limits of the data model (PROTOCOL.md section 2). */
#define TLY_CUSTOMER_MAX   128
#define TLY_METER_MAX       64
#define TLY_KEY_MAX        128
#define TLY_QTY_MAX        (UINT64_C (1) << 62)
#define TLY_PROPS_MAX       16
#define TLY_PROP_KEY_MAX    64
#define TLY_PROP_VAL_MAX   256
#define TLY_BATCH_MAX    10000
#define TLY_REQUEST_MAX  (16u * 1024u * 1024u)   /* default max request bytes */

/*  A borrowed byte string: not NUL-terminated, owned by someone else. */
typedef struct {
    const char *ptr;
    uint32_t len;
} tly_str;

/*  Milliseconds since the Unix epoch, from the real-time clock. */
uint64_t tly_now_ms (void);

/*  The environment variable name as a decimal number from min to max, for
    tuning and tests; dflt when it is unset or empty, and when it is not
    such a number (with a warning from who that says so). */
uint64_t tly_env_u64 (const char *who, const char *name, uint64_t dflt,
                      uint64_t min, uint64_t max);

#endif
