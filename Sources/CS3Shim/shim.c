#include "CS3Shim.h"

#include <curl/curl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
} growable;

static size_t collect(char *ptr, size_t size, size_t nmemb, void *user) {
    growable *g = user;
    size_t n = size * nmemb;
    if (g->len + n > g->cap) {
        size_t cap = g->cap ? g->cap : 4096;
        while (cap < g->len + n) cap *= 2;
        uint8_t *grown = realloc(g->data, cap);
        if (!grown) return 0;
        g->data = grown;
        g->cap = cap;
    }
    memcpy(g->data + g->len, ptr, n);
    g->len += n;
    return n;
}

// Keeps the ETag response header: CompleteMultipartUpload names each part by it.
static size_t header_line(char *ptr, size_t size, size_t nmemb, void *user) {
    cs3_response *out = user;
    size_t n = size * nmemb;
    if (n > 5 && strncasecmp(ptr, "etag:", 5) == 0) {
        size_t start = 5;
        while (start < n && (ptr[start] == ' ' || ptr[start] == '\t')) start++;
        size_t end = n;
        while (end > start && (ptr[end - 1] == '\r' || ptr[end - 1] == '\n' || ptr[end - 1] == ' ')) end--;
        size_t len = end - start < sizeof(out->etag) - 1 ? end - start : sizeof(out->etag) - 1;
        memcpy(out->etag, ptr + start, len);
        out->etag[len] = 0;
    }
    return n;
}

void cs3_global_init(void) {
    static int done = 0;
    if (!done) {
        curl_global_init(CURL_GLOBAL_DEFAULT);
        done = 1;
    }
}

void cs3_sha256(const uint8_t *data, size_t len, uint8_t digest[32]) {
    unsigned int out_len = 32;
    EVP_Digest(data, len, digest, &out_len, EVP_sha256(), NULL);
}

int cs3_perform(const char *method, const char *url, const char *region, const char *access_key,
                const char *secret_key, const char *const *headers, size_t header_count,
                const uint8_t *body, size_t body_len, long timeout_seconds, cs3_response *out,
                char *err, size_t err_len) {
    memset(out, 0, sizeof(*out));
    CURL *curl = curl_easy_init();
    if (!curl) {
        snprintf(err, err_len, "curl_easy_init failed");
        return -1;
    }
    char sigv4[256];
    snprintf(sigv4, sizeof(sigv4), "aws:amz:%s:s3", region);
    uint8_t digest[32];
    cs3_sha256(body ? body : (const uint8_t *)"", body ? body_len : 0, digest);
    char payload_header[96] = "x-amz-content-sha256: ";
    size_t at = strlen(payload_header);
    for (int i = 0; i < 32; i++) at += (size_t)snprintf(payload_header + at, sizeof(payload_header) - at, "%02x", digest[i]);

    struct curl_slist *list = NULL;
    list = curl_slist_append(list, payload_header);
    // (No "Expect:" line to turn 100-continue off: libcurl 7.88 would sign the header it then
    // leaves out, and every such request would fail its signature check.)
    list = curl_slist_append(list, "Content-Type: application/octet-stream");
    for (size_t i = 0; i < header_count; i++) list = curl_slist_append(list, headers[i]);

    growable received = {0};
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, sigv4);
    curl_easy_setopt(curl, CURLOPT_USERNAME, access_key);
    curl_easy_setopt(curl, CURLOPT_PASSWORD, secret_key);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, list);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &received);
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, header_line);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, out);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT, timeout_seconds);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT, 10L);
    if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
    } else if (strcmp(method, "GET") != 0) {
        curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method);
        // The body goes as POSTFIELDS so that libcurl sends it with the method above.
        curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(body ? body_len : 0));
        curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body ? (const char *)body : "");
    }
    CURLcode code = curl_easy_perform(curl);
    int rc = 0;
    if (code != CURLE_OK) {
        snprintf(err, err_len, "%s %s: %s", method, url, curl_easy_strerror(code));
        free(received.data);
        rc = -1;
    } else {
        curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &out->status);
        curl_off_t up = 0, down = 0;
        curl_easy_getinfo(curl, CURLINFO_SIZE_UPLOAD_T, &up);
        curl_easy_getinfo(curl, CURLINFO_SIZE_DOWNLOAD_T, &down);
        out->bytes_sent = (int64_t)up;
        out->bytes_received = (int64_t)down;
        out->body = received.data;
        out->body_len = received.len;
    }
    curl_slist_free_all(list);
    curl_easy_cleanup(curl);
    return rc;
}

void cs3_response_free(cs3_response *response) {
    free(response->body);
    response->body = NULL;
    response->body_len = 0;
}
