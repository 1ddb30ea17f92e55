/*
 * tcp-send: connects to HOST:PORT, sends BYTES bytes of a known pattern
 * (byte i of the stream is i % 251) in large writes, so that a Linux guest
 * with TSO and checksum offload hands the device large TCP segments with a
 * partial checksum; then shuts down its side and waits for the peer's FIN.
 *
 *   tcp-send HOST PORT BYTES
 *
 * Prints "nmvm-tcp-send: sent N bytes in T ms" (or what failed). Part of
 * nmvm's Linux appliance (guest-images/appliance/).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv)
{
	static unsigned char buf[65536];
	struct sockaddr_in sa = { .sin_family = AF_INET };
	unsigned long long total, sent = 0;
	long long start;
	int s;

	if (argc != 4 || inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
		fprintf(stderr, "usage: tcp-send HOST PORT BYTES\n");
		return 2;
	}
	sa.sin_port = htons((unsigned short)atoi(argv[2]));
	total = strtoull(argv[3], NULL, 10);
	alarm(120);
	s = socket(AF_INET, SOCK_STREAM, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		printf("nmvm-tcp-send: connect to %s:%s failed: %s\n", argv[1],
		       argv[2], strerror(errno));
		return 1;
	}
	start = now_ms();
	while (sent < total) {
		size_t n = sizeof(buf);
		ssize_t w;
		size_t i;

		if (n > total - sent)
			n = (size_t)(total - sent);
		for (i = 0; i < n; i++)
			buf[i] = (unsigned char)((sent + i) % 251);
		w = write(s, buf, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			printf("nmvm-tcp-send: write failed after %llu bytes: %s\n",
			       sent, strerror(errno));
			return 1;
		}
		sent += (unsigned long long)w;
	}
	shutdown(s, SHUT_WR);
	while (read(s, buf, sizeof(buf)) > 0)
		;
	close(s);
	printf("nmvm-tcp-send: sent %llu bytes in %lld ms\n", sent,
	       now_ms() - start);
	return 0;
}
